"""The run report: one self-contained HTML page of a run (or two side by side) with its losses,
its figures against their lines, its diagnostics, its samples and its config
(``polymodal report RUN [RUN_B]``); ``figures.py`` also draws the live diagnostics' TensorBoard
heatmaps."""
