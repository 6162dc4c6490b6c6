"""Validation harness: AFLW2000-3D accuracy (3DDFA protocol), parity with PyTorch, latency, reports and gates.

``edge3dfa validate FOLDER`` scores every artifact of a folder against the PyTorch checkpoint it came
from; ``edge3dfa export`` converts to every installed format first. Modules: ``datasets`` (evaluation
sets), ``metrics`` (NME, yaw bins, CED/AUC), ``harness`` (artifacts -> report rows), ``latency``,
``report`` (report.json schema, Markdown, HTML) and ``gates`` (pass/fail limits -> exit code).
"""
