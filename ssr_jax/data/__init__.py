"""Datasets: readers of VOC/COCO layouts and the synthetic world."""
