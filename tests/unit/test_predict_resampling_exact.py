"""Exact behaviour of medseg.inference.resampling's pieces (added from mutation testing; docs/testing.md):
the linear axis map at the borders and on one-voxel axes, its windows, and argmax ties."""

from __future__ import annotations

import numpy as np
import torch

from medseg.inference.resampling import AxisMap, GridPlan, interpolate_axis


def test_axis_map_samples_voxel_centres_and_clamps_at_both_borders():
    m = AxisMap.linear(n_in=4, n_out=6, scale=0.75, offset=-0.5)  # x = -0.5, 0.25, ..., 3.25
    assert m.i0.tolist() == [0, 0, 1, 1, 2, 2]
    assert m.i1.tolist() == [1, 1, 2, 2, 3, 3]
    # x clamped to [0, 3]: -0.5 -> 0, 3.25 -> 3 (the last input voxel: i0 2, weight 1)
    assert np.allclose(m.w.numpy(), [0.0, 0.25, 0.0, 0.75, 0.5, 1.0])
    values = torch.tensor([10.0, 20.0, 40.0, 80.0])
    assert np.allclose(interpolate_axis(values, 0, m).numpy(), [10.0, 12.5, 20.0, 35.0, 60.0, 80.0])


def test_a_one_voxel_axis_is_copied_and_a_two_voxel_axis_interpolated():
    one = AxisMap.linear(n_in=1, n_out=3, scale=0.5, offset=0.0)
    assert one.i0.tolist() == [0, 0, 0] and one.i1.tolist() == [0, 0, 0] and one.w.tolist() == [0.0, 0.0, 0.0]
    two = AxisMap.linear(n_in=2, n_out=3, scale=0.5, offset=0.0)
    assert two.i0.tolist() == [0, 0, 0] and two.i1.tolist() == [1, 1, 1]
    assert np.allclose(two.w.numpy(), [0.0, 0.5, 1.0])


def test_a_window_reads_exactly_the_inputs_its_outputs_need():
    m = AxisMap.linear(n_in=10, n_out=20, scale=0.5, offset=0.0)
    lo, hi, part = m.window(6, 11)  # outputs 6..10 sample x = 3.0 ... 5.0: inputs 3..6 (6 with weight 0)
    assert (lo, hi) == (3, 7)
    assert part.i0.tolist() == [0, 0, 1, 1, 2] and part.i1.tolist() == [1, 1, 2, 2, 3]
    values = torch.arange(10, dtype=torch.float32) * 3
    assert torch.allclose(interpolate_axis(values[lo:hi], 0, part), interpolate_axis(values, 0, m)[6:11])


def test_labels_on_scan_takes_the_most_probable_class_and_the_lower_one_on_ties():
    plan = GridPlan.for_scan(np.eye(4), (2, 2, 3), "RAS", None)
    assert plan is not None and plan.model_shape == (2, 2, 3)
    p = torch.zeros((3, 2, 2, 3))
    p[0], p[1, 0], p[2, 1] = 0.2, 0.5, 0.9  # class 1 wins in x=0, class 2 in x=1
    p[1, 0, 0, 0] = p[2, 0, 0, 0] = 0.7  # a tie between classes 1 and 2: the lower one
    p[0, 1, 1, 2], p[2, 1, 1, 2] = 0.95, 0.0  # class 0 wins here
    labels = plan.labels_on_scan(p)
    expected = np.array([[[1, 1, 1], [1, 1, 1]], [[2, 2, 2], [2, 2, 0]]], np.uint8)
    assert labels.dtype == np.uint8 and np.array_equal(labels, expected)


def test_an_lps_scan_is_flipped_and_resampled_along_z_only():
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    plan = GridPlan.for_scan(lps, (8, 6, 4), "RAS", (1.0, 1.0, 1.0))
    assert plan is not None and plan.oriented_shape == (8, 6, 4) and plan.model_shape == (8, 6, 7)
    scan = np.arange(8 * 6 * 4, dtype=np.float32).reshape(8, 6, 4)
    on_model = plan.scan_to_model(scan).numpy()
    assert np.allclose(on_model[:, :, 0], scan[::-1, ::-1, 0]) and np.allclose(on_model[:, :, 2], scan[::-1, ::-1, 1])
    back = plan.oriented_to_scan(np.arange(8 * 6 * 4, dtype=np.uint8).reshape(8, 6, 4))
    assert np.array_equal(back, np.arange(8 * 6 * 4, dtype=np.uint8).reshape(8, 6, 4)[::-1, ::-1])


def test_a_multichannel_shape_plans_on_its_three_spatial_axes():
    plan = GridPlan.for_scan(np.eye(4), (8, 6, 4, 2), "RAS", None)  # (x, y, z, channels) as nibabel gives it
    assert plan is not None and plan.scan_shape == (8, 6, 4) and plan.model_shape == (8, 6, 4)
