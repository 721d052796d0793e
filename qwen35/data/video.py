"""Videos for the vision-language model: read through PyAV, prepared by transformers' Qwen3-VL
video processor.

What transformers decides, and is used here as it is: which frames to keep
(`Qwen3VLVideoProcessor.sample_frames`: `fps` frames per second of video, at least `min_frames`,
at most `max_frames`), the frame size (`smart_resize` of the video processor's module, over the
whole clip's pixel budget `size`), the patch order (the video processor itself, given the
prepared frames), and each frame pair's timestamp (`Qwen3VLProcessor._calculate_timestamps`).

What is done here, because transformers does it through torchvision and the torchvision wheels
on PyPI are CUDA builds that do not import against a CPU-only torch: the bicubic, antialiased
resize of the frames (the same `torch.nn.functional.interpolate` call torchvision's resize
makes, rounded back to 8 bits) and the rescale and normalisation with the processor's mean and
std. The placeholder text of a video is the processor's too: per frame pair
`<{t:.1f} seconds>` then `<|vision_start|>`, the frame's pads and `<|vision_end|>`, in place of
the chat template's one `<|video_pad|>`.

Frames are read lazily: `video_clip` reads the container's header only (frame count, rate,
size); `load_clip` decodes up to the last frame it needs and converts only the frames kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from qwen35.errors import UserError

VIDEO_PAD = "<|video_pad|>"


@dataclass(frozen=True)
class VideoClip:
    """What a video contributes, known from its header: the frames kept and their size."""

    path: str
    frames: tuple[int, ...]  # indices into the decoded stream, as the processor sampled them
    fps: float  # the video's own frame rate (timestamps are frame index / fps)
    height: int  # the size every frame is resized to
    width: int


def _av():
    try:
        import av
    except ImportError:
        raise UserError("videos are read with PyAV, which is not installed: pip install 'qwen35[video]'") from None
    return av


def video_clip(path: str, processor) -> VideoClip:
    """The clip the processor makes of the video at `path`, from the container's header (nothing
    decoded). OSError naming the file for one that is missing, unreadable or holds no video."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize
    from transformers.video_utils import VideoMetadata

    av = _av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise OSError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            height, width = stream.codec_context.height, stream.codec_context.width
    except (av.FFmpegError, OSError, ValueError) as e:
        raise OSError(f"video {path}: {e}") from None
    if not total or not rate or not height or not width:
        raise OSError(f"video {path}: no frames, frame rate or size in its header")
    metadata = VideoMetadata(total_num_frames=total, fps=float(Fraction(rate)), height=height, width=width)
    frames = processor.sample_frames(metadata, fps=processor.fps)
    height, width = smart_resize(num_frames=len(frames), height=height, width=width,
                                 temporal_factor=processor.temporal_patch_size,
                                 factor=processor.patch_size * processor.merge_size,
                                 min_pixels=processor.size["shortest_edge"], max_pixels=processor.size["longest_edge"])
    return VideoClip(path, tuple(int(i) for i in frames), metadata.fps, height, width)


def video_grid(clip: VideoClip, processor) -> tuple[int, int, int]:
    """(t, h, w) in patches, as the processor will report it (frames padded to pairs)."""
    t = -(-len(clip.frames) // processor.temporal_patch_size)
    return t, clip.height // processor.patch_size, clip.width // processor.patch_size


def video_placeholder(clip: VideoClip, processor) -> str:
    """The text that replaces a video's `<|video_pad|>`: what `Qwen3VLProcessor.replace_video_token`
    writes, one timestamped run of pads per frame pair."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    t, h, w = video_grid(clip, processor)
    # a static helper in all but name: it reads nothing of the processor it is a method of
    times = Qwen3VLProcessor._calculate_timestamps(None, list(clip.frames), clip.fps, processor.temporal_patch_size)
    frame = "<|vision_start|>" + VIDEO_PAD * (h * w // processor.merge_size ** 2) + "<|vision_end|>"
    return "".join(f"<{times[i]:.1f} seconds>" + frame for i in range(t))


def load_clip(clip: VideoClip) -> np.ndarray:
    """The clip's frames, uint8 [T, H, W, 3] at the video's own size: decoded in order up to the
    last one kept, only the kept ones converted to RGB."""
    av = _av()
    wanted = {}
    for position, index in enumerate(clip.frames):
        wanted.setdefault(index, []).append(position)
    frames: list = [None] * len(clip.frames)
    last = max(clip.frames)
    try:
        with av.open(clip.path) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    rgb = frame.to_ndarray(format="rgb24")
                    for position in wanted[index]:
                        frames[position] = rgb
                if index >= last:
                    break
    except (av.FFmpegError, OSError, ValueError) as e:
        raise OSError(f"video {clip.path} could not be decoded: {e}") from None
    if any(f is None for f in frames):
        raise OSError(f"video {clip.path} could not be decoded: it holds fewer frames than its header says")
    return np.stack(frames)


def video_pixels(clips: list[VideoClip], processor) -> dict[str, torch.Tensor]:
    """`pixel_values_videos` and `video_grid_thw` of the clips, in order (frames decoded now)."""
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    videos = []
    for clip in clips:
        frames = torch.from_numpy(load_clip(clip)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
        if frames.shape[-2:] != (clip.height, clip.width):
            # torchvision's resize of an 8-bit image: bicubic with antialiasing in float, rounded back
            frames = torch.nn.functional.interpolate(frames, size=(clip.height, clip.width), mode="bicubic",
                                                     align_corners=False, antialias=True).clamp_(0, 255).round_()
        videos.append((frames * processor.rescale_factor - mean) / std)
    # the frames are ready: the processor only orders the patches (its resizing and normalising
    # steps are torchvision's, done above)
    out = processor(videos=videos, do_sample_frames=False, do_resize=False, do_rescale=False, do_normalize=False,
                    do_convert_rgb=False, cap_pixels_per_frame=False, return_tensors="pt")
    grids = [list(video_grid(c, processor)) for c in clips]
    assert out["video_grid_thw"].tolist() == grids, (out["video_grid_thw"].tolist(), grids)
    return {"pixel_values_videos": out["pixel_values_videos"], "video_grid_thw": out["video_grid_thw"]}
