"""2D chest X-ray pretraining: masking strategies, chest contour, radiograph loading."""
