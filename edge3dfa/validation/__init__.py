"""Validation: AFLW2000-3D accuracy (3DDFA protocol), parity with PyTorch, latency, reports and gates.

``edge3dfa validate FOLDER`` scores every artifact of a folder against the PyTorch checkpoint it came
from; ``edge3dfa export`` (``edge3dfa.workflows.export``) converts to every installed format first. Modules:
``harness`` (artifacts -> report rows), ``rows`` (the row record), ``report`` (report.json schema, Markdown,
HTML), ``gates`` (pass/fail limits -> verdict and exit code) and ``cli``. The evaluation sets
(``edge3dfa.datasets``), metrics, predict and timing (``edge3dfa.measure``) live in the core.
"""
