"""The command line: `p2psl peer|run|plan|validate`, progress, the dashboard, the run summary."""
