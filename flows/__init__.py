"""Prefect orchestration of the MeDUET pipeline: orchestration only, no ML logic.

- ``dag``: the stage order and each stage's metrics/plots, read from ``dvc.yaml``
- ``pipeline``: the ``meduet`` flow (``dvc repro`` per stage, artifacts, ``dvc push``)
- ``serve``: serve the flow as deployment ``meduet/<orchestration.deployment_name>``
- ``local``: local Prefect server, served deployment and S3 endpoint as context managers
- ``run_local``: what ``make run`` runs
"""
