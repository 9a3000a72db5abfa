"""``filmgate sweep``: judge an existing dataset or archive (folders, file lists, a PACS) and report on it.

One job per module: :mod:`.sources` finds the films, :mod:`.work` is the unit of work (a batch of films in, rows
out, through the one judge), :mod:`.executors` runs that unit on local processes or a Dask cluster, :mod:`.store`
keeps the rows in an SQLite file in the output folder (so a rerun resumes), :mod:`.run` drives it all with a progress
bar, :mod:`.outputs`, :mod:`.report` and :mod:`.sort` write what a person reads and uses, :mod:`.pacs` sweeps a
DICOM archive by C-FIND and C-GET.
"""
