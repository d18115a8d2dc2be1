"""What to put where: plans, profiles, the cost and memory model, the MILP and the DP. Pure."""
