"""An empty feature catalogue: the feature job computes only its built-in views
(user_recent, item_recent, item_covisit), which serving and training need.

``FRESHREC_FEATURES=features.none`` is the lever when the job must do less per event: each
catalogue definition costs the streaming job about 0.2–0.27 ms per event (README, "Catalogue
speed"), and on two cores the default catalogue keeps the job from sustaining 300 events/s of
the Taobao slice (bench/learning.py).
"""
