"""The course dataset's files: ``images`` (which files count and how they decode), ``layout`` (the labeled splits,
class names and YAML labels), ``labels`` (what can be wrong with a split and what training does about it) and
``tinyset`` (a synthetic stand-in in the same layout, for tests and the demo). ``course_classes.txt``: the 100
class names in the labels' order."""
