"""C++/CUDA sources of the "native" extension; built by fuselm.native."""
