"""vad-flows: normalizing-flow building blocks shared by vad's flow detectors.

FastFlow, CFLOW-AD, CS-Flow, AST and U-Flow are written with FrEIA (github.com/vislearn/FrEIA), as their
official code is; this package holds what they share so that no plugin copies it:

* :func:`vad_flows.coupling.coupling_flow`: a chain of FrEIA ``AllInOneBlock`` couplings, built
  reproducibly from a seed (FrEIA draws its fixed permutations from NumPy's global generator);
* :func:`vad_flows.coupling.conv_subnet` and :func:`vad_flows.coupling.linear_subnet`: the
  coupling subnetworks of those papers;
* :func:`vad_flows.coupling.glow_flow`, :func:`vad_flows.coupling.gated_conv_subnet` and
  :func:`vad_flows.coupling.atan_clamp`: the GLOW couplings, gated subnetworks and soft clamp of
  the DifferNet / AST code (CS-Flow's clamp is the same);
* :func:`vad_flows.likelihood.positional_encoding_2d`: the sine/cosine encoding CFLOW-AD and AST
  condition on;
* :mod:`vad_flows.likelihood`: Gaussian log-likelihoods and the flows' negative log-likelihood
  loss;
* :func:`vad_flows.likelihood.log_det_by_jacobian`: the brute-force check of a flow's
  log-determinant that each flow plugin's tests use.

It registers no component.
"""

__version__ = "0.1.0"
