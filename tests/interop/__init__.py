"""Interoperability tests: models written with other SNN libraries (SpikingJelly, snnTorch, Norse), and
references computed with those libraries' own code."""
