"""Sources of the Python-backend models; the repository generator copies each to <model>/1/model.py.

They are thin adapters between Triton tensors and functions in `serving.runtime` and
`ensemble`, which are tested without a server.
"""
