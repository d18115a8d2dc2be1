"""What a peer does once the plan is agreed: the data-owner and compute-node roles."""
