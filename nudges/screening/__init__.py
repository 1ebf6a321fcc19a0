"""Population screening: every patient of a FHIR Bulk Data export through the hook-call pipeline, on Dask.

source.py ($export kick-off, polling, resumable download) → shards.py (input chunks regrouped by a hash of
the patient, written once to disk) → tasks.py (a shard's patients screened by calls.py: the same call,
pipeline and cards as a live hook call) over cluster.py (a Dask LocalCluster, an existing scheduler, or this
process) → run.py (the counts added up) → outputs.py (worklists, equity view, summary) and lists.py (FHIR
List resources on the server).
"""
