"""Merging two models' weights: the per-sample coefficients (JS, λ, DaWin's ratios, the Beta mixture), the fused
parameter store, the static merge rules, the methods registry and AdaMerging's test-time learning."""
