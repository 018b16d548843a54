"""Read-side queries over the store: runs, series, step records, heatmaps, forward statistics, reports."""
