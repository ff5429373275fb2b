"""Datasets: split readers, image loading, synthetic outfits, transforms."""
