"""One module per compile backend; ``edgeml.compile.targets`` maps target names to them."""
