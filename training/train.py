"""The training loop: seeded, resumable, CPU or CUDA, one step = one freshly augmented batch.

Randomness per step comes from ``numpy.random.default_rng([seed, step])``, so a resumed run sees exactly the batches
an uninterrupted one would have. Checkpoints (model, optimiser, step, elapsed time) are written atomically to
``<run_dir>/checkpoint.pt``; the finished model goes to ``<run_dir>/model.pt`` with the config it was trained with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from filmgate_training.config import REPO_ROOT, Config
from filmgate_training.data import make_batch, split_train, training_pool
from filmgate_training.model import FilmNet, build_model, count_parameters, filmnet_from_onnx, fold_batchnorm
from filmgate_training.tasks import get_task

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def lr_at(step: int, config: Config) -> float:
    """Linear warm-up, then cosine decay to 2% of the peak."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def training_identity(config: Config) -> dict[str, Any]:
    """The parts of a config that change the trained weights (a checkpoint resumes only if these are equal)."""
    d = config.to_dict()
    for key in ("progress", "log_every", "checkpoint_every", "threads", "device"):
        d["train"].pop(key, None)
    d["data"].pop("workers", None)
    for key in ("evaluate", "version", "run_dir", "models_dir", "val_notes", "card_limits"):
        d.pop(key, None)
    return d


def load_trained(run_path: Path, device: str = "cpu") -> tuple[FilmNet, dict[str, Any]]:
    """The finished model of a run (eval mode) and its metadata."""
    path = run_path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model; run `python -m filmgate_training fit` first")
    blob = torch.load(path, map_location=device, weights_only=False)
    model = build_model(blob["num_outputs"], tuple(blob["widths"]), blob["dropout"])
    if blob.get("folded"):
        model = fold_batchnorm(model)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, blob


def fit(config: Config, resume: bool = True) -> Path:
    """Train the config's task; returns the path of ``model.pt``."""
    torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)
    device = pick_device(config.train.device)
    task = get_task(config.task)
    run = config.run_path
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    train_films, calib_films = split_train(config, task)
    t0 = time.perf_counter()
    pool = training_pool(config, task, train_films, progress=config.train.progress)
    cache_seconds = time.perf_counter() - t0
    log.info("training films: %d %s; calibration films held out: %d", len(pool.films), pool.sources(), len(calib_films))

    model = build_model(task.num_outputs, config.model.widths, config.model.dropout)
    folded = config.train.init_from.endswith(".onnx")  # fine-tuning a shipped model: its BatchNorms are folded
    if folded:
        model = fold_batchnorm(model)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    start, elapsed, cpu, history = 0, 0.0, 0.0, []
    ckpt_path = run / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt.get("identity") == training_identity(config):
            model.load_state_dict(ckpt["state_dict"])
            opt.load_state_dict(ckpt["optimizer"])
            start, elapsed, history = ckpt["step"], ckpt["elapsed"], ckpt["history"]
            cpu = ckpt.get("cpu", 0.0)
            log.info("resumed from %s at step %d", ckpt_path, start)
        else:
            log.warning("checkpoint %s was made with another config: starting afresh", ckpt_path)
    if config.train.init_from and start == 0:
        init = Path(config.train.init_from)
        init = init if init.is_absolute() else REPO_ROOT / init
        init = init / "model.pt" if init.is_dir() else init
        if folded:
            state = filmnet_from_onnx(str(init), tuple(config.model.widths), config.model.dropout).state_dict()
        else:
            state = torch.load(init, map_location=device, weights_only=False)["state_dict"]
        own = model.state_dict()
        fresh = [k for k in state if k.startswith("head.") and state[k].shape != own[k].shape]
        for k in fresh:  # another task's head (e.g. the classifier's under a new output): start it afresh
            state[k] = own[k]
        model.load_state_dict(state)
        log.info("initialised from %s (fine-tuning)%s", init, f"; new head {fresh}" if fresh else "")

    def checkpoint(step: int) -> None:
        _save(
            {
                "config": config.to_dict(),
                "identity": training_identity(config),
                "state_dict": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "cpu": cpu,
                "history": history,
            },
            ckpt_path,
        )

    bar = None
    if config.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=config.train.steps, initial=start, desc=f"fit {task.name}", unit="step", mininterval=2.0)
    model.train()
    running, correct, seen = 0.0, 0, 0
    for step in range(start, config.train.steps):
        t_step, c_step = time.perf_counter(), time.process_time()
        rng = np.random.default_rng([config.train.seed, step])
        torch.manual_seed(config.train.seed * 1_000_003 + step)  # dropout: resumed runs see the same masks
        x, y = make_batch(pool, task, config, rng, config.train.batch_size)
        xb, yb = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        out = model(xb)
        loss = task.loss(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        elapsed += time.perf_counter() - t_step
        cpu += time.process_time() - c_step
        running += float(loss.detach())
        if task.kind == "classifier":
            correct += int((out.detach().argmax(1) == yb).sum())
        seen += len(y)
        done = step + 1
        if done % config.train.log_every == 0 or done == config.train.steps:
            n = config.train.log_every if done % config.train.log_every == 0 else done % config.train.log_every
            entry = {"step": done, "loss": running / n, "acc": correct / max(1, seen), "seconds": round(elapsed, 1)}
            history.append(entry)
            if bar is not None:
                bar.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{entry['acc']:.4f}")
            else:
                log.info("step %d loss %.4f acc %.4f (%.0f s)", done, entry["loss"], entry["acc"], elapsed)
            running, correct, seen = 0.0, 0, 0
        if bar is not None:
            bar.update(1)
        if done % config.train.checkpoint_every == 0 and done < config.train.steps:
            checkpoint(done)
    if bar is not None:
        bar.close()
    model.eval()
    checkpoint(config.train.steps)
    final = run / "model.pt"
    _save(
        {
            "config": config.to_dict(),
            "task": task.name,
            "num_outputs": task.num_outputs,
            "widths": list(config.model.widths),
            "dropout": config.model.dropout,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "train_seconds": round(elapsed, 1),
            "cpu_seconds": round(cpu, 1),  # CPU time of all threads: the wall time on idle cores, times threads
            "cache_seconds": round(cache_seconds, 1),
            "steps": config.train.steps,
            "device": str(device),
            "threads": config.train.threads,
            "parameters": count_parameters(model),
            "folded": folded,
            "train_films": pool.sources(),
            "calibration_films": len(calib_films),
            "history": history,
        },
        final,
    )
    log.info("trained %s in %.0f s (%d steps); model at %s", task.name, elapsed, config.train.steps, final)
    return final
