"""Adapter methods (LoRA and its relatives): peft configs, validation, initialisation."""
