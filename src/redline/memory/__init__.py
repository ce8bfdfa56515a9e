"""Memory mechanisms: how much a step needs (probe), what to do when it does not fit (guard),
and the sizes in between (sizes). The batch search that uses them is a workflow: autobatch.py.

`probe` measures: the CUDA caching allocator's statistics on a GPU, and on CPU a tracker of
live tensor storages that can also enforce a budget by raising a genuine
`torch.OutOfMemoryError` — which is how the OOM paths run without a GPU.
"""
