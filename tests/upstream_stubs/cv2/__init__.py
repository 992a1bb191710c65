"""OpenCV (cv2): Open-Sora reads videos with it only for reference conditioning, which the tests do not use."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise NotImplementedError(f"cv2 stand-in: cv2.{name} is not available in the tests")
