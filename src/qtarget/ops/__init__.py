"""Layer 2: the fused, chunked loss engine. `fused_token_loss` computes any objective from hidden
states and the LM-head weight without materialising the [N, V] logits (see chunked.py)."""
from qtarget.ops.budget import DEFAULT_BUDGET_BYTES, chunk_rows
from qtarget.ops.chunked import MODES, fused_token_loss

__all__ = ["fused_token_loss", "chunk_rows", "DEFAULT_BUDGET_BYTES", "MODES"]
