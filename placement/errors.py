class PlanError(ValueError):
    """The request cannot be planned as asked: bad cluster, impossible forced choice."""
