"""Reporting: the results store's cell records -> values per row and column (grid) -> the effect of the
ranking loss and its statistics (effects, stats) -> tables and plots, laid out by a layout declaration
(layouts; the paper's numbers beside ours: paper). Nothing here runs a cell or opens a cell's files."""
