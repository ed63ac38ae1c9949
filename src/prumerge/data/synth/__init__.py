"""A generated benchmark of small objects on a plain background, seeded and deterministic.

Each scene is a ``size``×``size`` image (224 by default) divided into a 3×3 grid of cells. Two
to six objects stand in distinct cells, each a coloured shape (optionally also small patches
of scikit-image photos), 28-44 px across, jittered inside its cell. The questions ask what
visual-token reduction can lose: whether a small object is there at all, the attribute of
the object in one place, how many there are, and where objects stand relative to each other.

Question types (the ``subtask`` of each sample):

==================== ================================================== =====================
subtask              example                                            answer
==================== ================================================== =====================
exist_random         Is there a green star in the image?                yes / no
exist_popular        Is there a red circle in the image?                yes / no
exist_adversarial    Is there a blue square in the image?               yes / no
color                What color is the object in the top left of ...?   a colour
shape                What shape is the object in the center of ...?     a shape
count                How many circles are there in the image?           0-6 (digits)
relation             Is the red circle to the left of the blue star?    yes / no
==================== ================================================== =====================

The existence questions follow POPE: per scene and split one question about a present object
(answer yes) and one about an absent object (answer no), with the absent object drawn

- *random*: uniformly among the absent colour-shape pairs;
- *popular*: among the three most frequent absent pairs. Objects are drawn with a Zipf-like
  prior over the colour-shape pairs (:func:`pair_popularity`), so some are common, as in COCO;
- *adversarial*: among absent pairs that share the colour or the shape of a present object,
  the near misses that need attribute binding (POPE uses co-occurring objects).

Answer vocabulary (:data:`ANSWER_VOCAB`, 20 words): yes, no; the colours red, green, blue,
yellow, purple, orange; the shapes circle, square, triangle, star, cross; the digits 0-6.
Objects are unique by colour and shape within a scene, so "the red circle" names one object.

Scenes are drawn from a generator seeded by ``(seed, split, index)``, so any scene can be made
on its own (cheap random access, and data-parallel sharding), the train and test splits never
share a scene, and the same arguments give the same pixels and questions on any machine.
"""

# The parts: objects.py (what scenes are made of), draw.py (drawing them), scenes.py
# (generating scenes and questions, and writing them out).
from prumerge.data.synth.draw import render
from prumerge.data.synth.objects import (
    ANSWER_VOCAB,
    COLORS,
    PHOTOS,
    QUESTION_TYPES,
    SHAPES,
    Question,
    SceneObject,
    SynthConfig,
    cell_name,
    pair_popularity,
)
from prumerge.data.synth.scenes import Scene, generate, generate_scene, iter_samples, write_split

__all__ = [
    "ANSWER_VOCAB",
    "COLORS",
    "PHOTOS",
    "QUESTION_TYPES",
    "SHAPES",
    "Question",
    "Scene",
    "SceneObject",
    "SynthConfig",
    "cell_name",
    "generate",
    "generate_scene",
    "iter_samples",
    "pair_popularity",
    "render",
    "write_split",
]
