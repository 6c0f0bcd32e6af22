"""Language-model work: base models, preference data, the DPO/SFT training loop, tasks."""
