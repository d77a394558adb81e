"""Data: reading, splitting, tokenizing and batching the datasets gptft fine-tunes on."""
