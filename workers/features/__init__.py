"""Feature-vector training and evaluation tasks (the gpu and cpu queues)."""
