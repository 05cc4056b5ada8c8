"""Edge devices: llama.cpp tools built for this machine or cross-compiled, and provisioning over SSH."""
