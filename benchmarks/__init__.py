"""One benchmark protocol and its reports: timing, reference-loop comparison, plots and README tables."""
