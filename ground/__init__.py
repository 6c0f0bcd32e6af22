"""The ground layer: settings and the event contract. Imports nothing of ours; everything imports it."""
