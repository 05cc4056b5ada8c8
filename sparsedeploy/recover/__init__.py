"""Recovery after pruning: distillation from the dense model, with the pattern held exact."""
