"""Class names and CLIP prompts of the built-in datasets (data only).

`specs.py` pairs them with the rest of each dataset's description. No
imports: config files and the cheap modules may read these tuples.
"""

# --- class names (data) -----------------------------------------------------
# Names of the classes as the data labels them (metrics tables, legends,
# VOC XML annotations): background first; label id = index.
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus",
    "car", "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike",
    "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# The 80 COCO categories in increasing category-id order; label id = rank.
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus",
    "train", "truck", "boat", "traffic light", "fire hydrant", "stop sign",
    "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


# --- prompt lists -----------------------------------------------------------
# Facts copied from WeCLIP `WeCLIP/clip/clip_text.py` (zbf1991/WeCLIP @
# 0f47db4), itself identical to CLIP-ES `clip_text.py` (linyq2117/CLIP-ES @
# 3893f81). Each string is one prompt: the commas inside a string are part of
# the text given to the template, not separators.

# `new_class_names`: VOC foreground names with synonyms.
VOC_FG_PROMPTS = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle",
    "bus", "car", "cat", "chair seat", "cow",
    "diningtable", "dog", "horse", "motorbike",
    "person with clothes,people,human",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor screen",
)

# `BACKGROUND_CATEGORY`.
VOC_BG_PROMPTS = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake",
    "water", "river", "sea", "railway", "railroad", "keyboard", "helmet",
    "cloud", "house", "mountain", "ocean", "road", "rock", "street",
    "valley", "bridge", "sign",
)

# `new_class_names_coco`, spellings kept as WeCLIP embeds them, including the
# typo "sknowboard" (snowboard) and the renamings "glove" (baseball glove),
# "dessertspoon" (spoon), "necktie" (tie), "remote control" (remote).
COCO_FG_PROMPTS = (
    "person with clothes,people,human", "bicycle", "car", "motorbike",
    "aeroplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird avian",
    "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack,bag",
    "umbrella,parasol", "handbag,purse", "necktie", "suitcase", "frisbee",
    "skis", "sknowboard", "sports ball", "kite", "baseball bat",
    "glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "dessertspoon",
    "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair seat", "sofa", "pottedplant", "bed",
    "diningtable", "toilet", "tvmonitor screen", "laptop", "mouse",
    "remote control", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hairdrier,blowdrier", "toothbrush",
)

# `BACKGROUND_CATEGORY_COCO`: the VOC list without "keyboard" (a COCO class)
# and "sign".
COCO_BG_PROMPTS = tuple(
    p for p in VOC_BG_PROMPTS if p not in ("keyboard", "sign")
)

# The class names paired with the prompts (`text.dataset_prompts`):
# background first. VOC's are `VOC_CLASSES`; COCO's are WeCLIP's plain
# `class_names_coco`, which spells some classes the VOC way (motorbike,
# aeroplane, sofa, pottedplant, ...), unlike the data's `COCO_CLASSES`.
VOC_CLASS_NAMES = VOC_CLASSES

COCO_CLASS_NAMES = (
    "background",
    "person", "bicycle", "car", "motorbike", "aeroplane",
    "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "sofa", "pottedplant", "bed",
    "diningtable", "toilet", "tvmonitor", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
