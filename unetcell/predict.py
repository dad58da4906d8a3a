"""Overlap-tile prediction of whole images and slides (owned by the tiling/predict work).

Interface the rest of unetcell relies on (to be implemented):

    predictor = load_predictor(model_path, config=None)
    predictor.probabilities(image)   # H x W x C raw image -> H x W float32 foreground probability
    predictor.labels(image)          # H x W x C raw image -> H x W int32 instance labels
"""
