"""One peer's life: agreeing on a plan, the roles that train, recovery, rejoining, the torch worker."""
