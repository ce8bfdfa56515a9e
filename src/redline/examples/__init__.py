"""Built-in example tasks (`redline train --help` lists them); they need `redline[examples]`."""
