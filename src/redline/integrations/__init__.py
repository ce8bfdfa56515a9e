"""redline inside other people's loops: Lightning (`integrations.lightning`) and the
Hugging Face Trainer (`integrations.transformers`), one callback each."""
