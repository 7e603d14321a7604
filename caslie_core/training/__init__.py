"""LoRA fine-tuning, Ray-free: `data` (which rows train, prompts, tokens), `lora`, `distributed` (FSDP),
`recipe` (`LoRARecipe`: setup / load_checkpoint / train / save_checkpoint / cleanup), `plan` (checks before any
worker starts), `outputs` (final adapter and summary)."""
