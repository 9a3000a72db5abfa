"""Compose, Kubernetes, Grafana and the filmgate deploy configurations agree with each other and with the contract.

No Docker engine or cluster runs here, so the checks are those that catch real mistakes: Kubernetes schemas
(kubernetes-validate, strict), every file Compose mounts exists, ports and AE titles line up between filmgate,
the Orthanc peers and Prometheus, the GPU StatefulSet differs from the CPU one only where it must, every
configuration passes `filmgate check-config`, and the dashboard is fresh and only uses contract metric names.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import DEPLOY, exported_series_names, metrics_names_in_contract, tool

K8S = DEPLOY / "k8s"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s_manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _filmgate_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("filmgate"), "check-config", str(path)], capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------------------ Kubernetes


def test_kubernetes_manifests_validate_strictly():
    manifests = _k8s_manifests()
    assert len(manifests) >= 6
    res = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", *map(str, manifests)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_kubernetes_validate_is_not_blind(tmp_path):
    bad = (K8S / "cpu" / "statefulset.yaml").read_text().replace("readinessProbe:", "readinesProbe:")
    (tmp_path / "bad.yaml").write_text(bad)
    res = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(tmp_path / "bad.yaml")], capture_output=True, text=True
    )
    assert res.returncode != 0 and "readinesProbe" in res.stdout + res.stderr


@pytest.mark.parametrize("variant", ["base", "cpu", "gpu"])
def test_kustomizations_list_existing_files(variant):
    k = yaml.safe_load((K8S / variant / "kustomization.yaml").read_text())
    for res in k["resources"]:
        target = (K8S / variant / res).resolve()
        assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{variant}: {res}"
        # kustomize refuses files outside the kustomization's folder (directories with a kustomization are fine)
        assert target.is_dir() or target.is_relative_to((K8S / variant).resolve()), f"{variant}: {res}"


def _strip_gpu(obj):
    """The GPU StatefulSet less what may differ from the CPU one."""
    assert obj["spec"]["template"]["metadata"]["labels"].pop("filmgate/accelerator") == "gpu"
    spec = obj["spec"]["template"]["spec"]
    spec.pop("nodeSelector")
    spec.pop("tolerations")
    (c,) = spec["containers"]
    c["image"] = c["image"].replace("filmgate-cuda:", "filmgate:")
    c["env"] = [e for e in c["env"] if e["name"] != "NVIDIA_DRIVER_CAPABILITIES"]
    assert c["resources"]["limits"].pop("nvidia.com/gpu") == 1
    return obj


def test_gpu_statefulset_differs_only_where_it_must():
    (cpu,) = _docs(K8S / "cpu" / "statefulset.yaml")
    (gpu,) = _docs(K8S / "gpu" / "statefulset.yaml")
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    assert _strip_gpu(gpu) == cpu


def test_statefulset_promises():
    (sts,) = _docs(K8S / "cpu" / "statefulset.yaml")
    cm = _docs(K8S / "base" / "configmap.yaml")[0]
    cfg = yaml.safe_load(cm["data"]["filmgate.yaml"])
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"dicom": cfg["listener"]["port"], "http": cfg["http"]["port"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # every replica has its own spool on its own PersistentVolume
    (claim,) = spec["volumeClaimTemplates"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert Path(cfg["spool"]["path"]).is_relative_to(mount["mountPath"])
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    # the configuration the pod reads is the ConfigMap's
    env = {e["name"]: e["value"] for e in c["env"]}
    cfg_mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert env["FILMGATE_CONFIG"] == f"{cfg_mount['mountPath']}/filmgate.yaml"
    assert next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"] == cm["metadata"]["name"]
    # a drain finishes before the kubelet kills the pod
    assert cfg["workers"]["drain_timeout"] < pod["terminationGracePeriodSeconds"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    services = _docs(K8S / "base" / "service.yaml")
    assert spec["serviceName"] in {s["metadata"]["name"] for s in services}
    for s in services:
        assert s["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()


def test_configmap_config_passes_check_config(tmp_path):
    cm = _docs(K8S / "base" / "configmap.yaml")[0]
    path = tmp_path / "filmgate.yaml"
    path.write_text(cm["data"]["filmgate.yaml"])
    res = _filmgate_check(path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_kubernetes_scrape_job_is_named_filmgate():
    """Debian's promtool lacks Kubernetes discovery, so this file's structure is checked here."""
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "kubernetes.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "filmgate"
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    keeps = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == "filmgate"
    assert keeps[("__meta_kubernetes_pod_container_port_name",)] == "http"
    # the GPU pods' label becomes the target label that FilmgateGpuNotUsed selects on
    (gpu_sts,) = _docs(K8S / "gpu" / "statefulset.yaml")
    label = next(k for k in gpu_sts["spec"]["template"]["metadata"]["labels"] if k.endswith("accelerator"))
    meta = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)
    copy = next(r for r in job["relabel_configs"] if r.get("source_labels") == [meta])
    assert copy["target_label"] == "accelerator"
    rules = (DEPLOY / "prometheus" / "rules" / "filmgate.rules.yml").read_text()
    assert 'accelerator="gpu"' in rules


# ------------------------------------------------------------------------------------------------ filmgate configs


@pytest.mark.parametrize("name", sorted(p.name for p in (DEPLOY / "filmgate").glob("*.yaml")))
def test_filmgate_deploy_configs_pass_check_config(name):
    res = _filmgate_check(DEPLOY / "filmgate" / name)
    assert res.returncode == 0, res.stdout + res.stderr


def test_deploy_configs_fit_the_image():
    """Every configuration run in the image reads the models where the image has them and writes on its volume."""
    image = yaml.safe_load((DEPLOY / "filmgate" / "container.yaml").read_text())
    cm = yaml.safe_load(_docs(K8S / "base" / "configmap.yaml")[0]["data"]["filmgate.yaml"])
    compose = yaml.safe_load((DEPLOY / "filmgate" / "with-orthanc.yaml").read_text())
    for cfg in (cm, compose):
        assert cfg["detectors"]["models_dir"] == image["detectors"]["models_dir"]
        paths = [cfg["spool"]["path"]]
        for d in cfg["destinations"].values():
            paths += [d[k] for k in ("path", "dead_letter") if d.get(k)]
        for p in paths:
            assert Path(p).is_relative_to("/var/lib/filmgate"), f"{p} is not on the image's volume"


def test_check_config_is_not_blind(tmp_path):
    cfg = yaml.safe_load((DEPLOY / "filmgate" / "with-orthanc.yaml").read_text())
    cfg["routes"]["accept"] = ["research"]  # no such destination
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = _filmgate_check(path)
    assert res.returncode != 0 and "routes.accept" in res.stderr


# ------------------------------------------------------------------------------------------------ Compose


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml", "compose.local.yaml"])
def test_compose_files_match_the_compose_specification(name):
    res = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_schema_check_is_not_blind(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text((DEPLOY / "compose.yaml").read_text().replace("stop_grace_period:", "stop_grace_periode:"))
    res = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad)], capture_output=True, text=True
    )
    assert res.returncode != 0 and "stop_grace_periode" in res.stdout


def test_compose_services_and_mounts_exist():
    services = COMPOSE["services"]
    assert {"filmgate", "orthanc-hospital", "orthanc-research", "prometheus", "grafana"} <= set(services)
    build = services["filmgate"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert build["target"] == "runtime"
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
            else:
                assert src in COMPOSE["volumes"], f"{name}: named volume {src} not declared"


def _compose_mount(service: str, target: str) -> Path:
    for vol in COMPOSE["services"][service]["volumes"]:
        src, dst = vol.split(":")[:2]
        if dst == target:
            return DEPLOY / src
    raise AssertionError(f"{service} mounts nothing at {target}")


def test_compose_wiring_lines_up():
    """AE titles, hosts and ports agree between filmgate's configuration, both Orthanc and Prometheus."""
    svc = COMPOSE["services"]
    fg_path = _compose_mount("filmgate", svc["filmgate"]["environment"]["FILMGATE_CONFIG"])
    fg = yaml.safe_load(fg_path.read_text())
    hospital = json.loads(_compose_mount("orthanc-hospital", "/etc/orthanc/orthanc.json").read_text())
    research = json.loads(_compose_mount("orthanc-research", "/etc/orthanc/orthanc.json").read_text())

    # hospital -> filmgate: the modality entry is filmgate's listener; the hospital's AE is on the allow-list
    mod = hospital["DicomModalities"]["filmgate"]
    assert (mod["AET"], mod["Host"], mod["Port"]) == (fg["listener"]["ae_title"], "filmgate", fg["listener"]["port"])
    assert hospital["DicomAet"] in {r["ae_title"] for r in fg["listener"]["allow"]}
    # filmgate -> research: the accept route is a DICOM destination to the research Orthanc, which knows filmgate
    (accept,) = fg["routes"]["accept"]
    dest = fg["destinations"][accept]
    assert dest["type"] == "dicom"
    assert (dest["ae_title"], dest["host"], dest["port"]) == (research["DicomAet"], "orthanc-research", 4242)
    assert research["DicomPort"] == 4242
    assert research["DicomModalities"]["filmgate"]["AET"] == dest["calling_ae"]
    for orthanc in (hospital, research):
        assert orthanc["DicomCheckCalledAet"] is True and orthanc["DicomAlwaysAllowStore"] is False
    # everything the node writes is on its volume
    data_mount = next(v for v in svc["filmgate"]["volumes"] if v.startswith("filmgate-data:")).split(":")[1]
    for p in (fg["spool"]["path"], dest["dead_letter"], fg["destinations"]["quarantine"]["path"]):
        assert Path(p).is_relative_to(data_mount), p
    # published ports and Prometheus' target are the node's
    ports = {int(p.split(":")[1]) for p in svc["filmgate"]["ports"]}
    assert ports == {fg["listener"]["port"], fg["http"]["port"]}
    prom = yaml.safe_load(_compose_mount("prometheus", "/etc/prometheus/prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "filmgate")
    assert job["static_configs"][0]["targets"] == [f"filmgate:{fg['http']['port']}"]
    assert prom["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert _compose_mount("prometheus", "/etc/prometheus/rules") == DEPLOY / "prometheus" / "rules"


def test_compose_gpu_override_selects_cuda_target():
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["filmgate"]
    assert gpu["build"]["target"] == "runtime-cuda"
    (dev,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


# ------------------------------------------------------------------------------------------------ Grafana


DASHBOARD = DEPLOY / "grafana" / "dashboards" / "filmgate.json"


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def test_dashboard_is_fresh():
    res = subprocess.run(
        [sys.executable, str(DEPLOY / "grafana" / "build_dashboard.py"), "--check"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr


def test_dashboard_is_provisioned_with_its_datasource():
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["url"] == "http://prometheus:9090"
    doc = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in doc["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in doc["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "filmgate.yaml").read_text())
    assert _compose_mount("grafana", prov["providers"][0]["options"]["path"]) == DASHBOARD.parent
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_covers_the_issue():
    """Quarantine overall/by reason/by sender, throughput, p50/p95/p99, backlog, failures, dead letters, models."""
    exprs = "\n".join(dashboard_queries())
    for needle in (
        'outcome="quarantine"',
        "sum by (reason) (rate(filmgate_quarantine_reasons_total",
        "sum by (calling_ae) (rate(filmgate_decisions_total",
        "filmgate_instances_received_total",
        "histogram_quantile(0.5, sum by (le) (rate(filmgate_end_to_end_seconds_bucket",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "filmgate_spool_depth",
        "filmgate_delivery_failures_total",
        "filmgate_dead_letters_total",
        "filmgate_model_info",
        "sum by (reason) (filmgate_review_pending",
        'filmgate_reviewed{job="filmgate", instance=~"$instance", state="released"}',
        'filmgate_reviewed{job="filmgate", instance=~"$instance", state="confirmed"}',
        "filmgate_shadow_would_quarantine_total",
    ):
        assert needle in exprs, needle


def test_dashboard_uses_only_contract_metric_names():
    allowed = exported_series_names(metrics_names_in_contract())
    used = set()
    for expr in dashboard_queries():
        used |= set(re.findall(r"(?<![:\w])filmgate_[a-z_]+(?![:\w])", expr))
    assert used - allowed == set(), f"not in docs/ARCHITECTURE.md: {sorted(used - allowed)}"
