"""routezoo.layers"""
