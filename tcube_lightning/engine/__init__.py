"""The torch engine (no Lightning): both models in the store, prompt tokens and zero-shot heads, the per-batch
coefficients, the logits of every model a method asks for, and the exact per-sample pass."""
