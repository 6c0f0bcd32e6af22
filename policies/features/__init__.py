"""Feature-vector policies (paper 1's setting: x in R^d, finite Y): the two-stage model, its fitting recipes,
the condition tests."""
