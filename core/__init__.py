"""The contracts every other layer agrees on: class and tensor names, the dataset layout,
decoding, preprocessing, the serving facts of an exported network and the image limits.

Imports only numpy, Pillow, scipy, pydicom and the standard library: the Triton Python
models, the client library, training and export all build on it.
"""
