// Python bindings of omnifast's C++ CPU kernels (module omnifast._C).
#include <torch/extension.h>

#include "ctc.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "omnifast C++ CPU kernels";
  m.def("ctc_nll_and_grad", &omnifast::ctc_nll_and_grad, py::arg("inputs"), py::arg("targets"),
        py::arg("input_lengths"), py::arg("target_lengths"), py::arg("blank"),
        py::arg("zero_infinity"), py::arg("grad_scale"), py::arg("from_logits"),
        "CTC negative log-likelihood per sequence and its scaled gradient (None: no gradient)");
}
