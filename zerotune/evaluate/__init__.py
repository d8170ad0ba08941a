"""Evaluation: metrics, plots and reports of trained runs.

    metrics.py    classification and regression metrics (torchmetrics' functional API)
    plots.py      training curves and the confusion matrix, as PNG files under RUN/plots/
    report.py     report.md after training: the held-out metrics and the curves
    api.py        the evaluate and predict verbs
"""
