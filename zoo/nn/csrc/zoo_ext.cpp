// zoo.nn._ext: the compiled loops of zoo.nn.fused (built by `python -m zoo.nn.build`, one build per ISA level).
// The parts: common.h (shared pieces), norms.h, gemm.h, loops.h, lstm.h (FusedLSTM), gru.h (FusedGRU).
#include "gru.h"
#include "lstm.h"


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zoo.nn.fused: one step of the fused LSTM recurrence between its GEMMs, and the input term's norm";
  py::enum_<Kind>(m, "Kind", py::module_local())
      .value("NONE", NONE)
      .value("LN", LN)
      .value("RMS", RMS)
      .value("BN_TRAIN", BN_TRAIN)
      .value("AFFINE", AFFINE);
  py::class_<Norm>(m, "Norm", py::module_local())  // (module-local: builds of two levels can load in one process)
      .def(py::init<>())
      .def_readwrite("kind", &Norm::kind)
      .def_readwrite("fw", &Norm::fw)
      .def_readwrite("fb", &Norm::fb)
      .def_readwrite("w", &Norm::w)
      .def_readwrite("mean", &Norm::mean)
      .def_readwrite("rstd", &Norm::rstd)
      .def_readwrite("rm", &Norm::rm)
      .def_readwrite("rv", &Norm::rv)
      .def_readwrite("per_step", &Norm::per_step)
      .def_readwrite("eps", &Norm::eps)
      .def_readwrite("momentum", &Norm::momentum)
      .def_readwrite("dw", &Norm::dw)
      .def_readwrite("db", &Norm::db);
  m.attr("MIN_ROWS") = kMinRows;  // (the tests hold it equal to zoo.nn.norm.MIN_ROWS)
  m.def("forward_loop", &forward_loop, "FusedLSTM forward: every step, GEMMs included", py::arg("nh"), py::arg("nc"),
        py::arg("weight"), py::arg("panels"), py::arg("h0"), py::arg("u"), py::arg("gscale"), py::arg("c0"),
        py::arg("s"), py::arg("c"), py::arg("sc"), py::arg("h"), py::arg("z_save"), py::arg("batch_sizes"),
        py::arg("train"), py::arg("nx") = Norm(), py::arg("x") = py::none(), py::arg("wx") = py::none(),
        py::arg("x_panels") = py::none());
  m.def("backward_loop", &backward_loop, "FusedLSTM backward: a range of steps, GEMMs included");
  m.def("gru_forward_loop", &gru_forward_loop, "FusedGRU forward: every step, GEMMs included");
  m.def("gru_backward_loop", &gru_backward_loop, "FusedGRU backward: a range of steps, GEMMs included");
  m.attr("brgemm") = py::bool_(ZOO_BRGEMM);  // the float32 recurrent GEMM through brgemm (x86-64)
  m.attr("brgemm_bf16") = py::bool_(bf16_blocks_supported());  // bfloat16 blocks (autocast): oneDNN packs for AMX
  m.attr("PANEL_WIDTH") = kBlock;  // output features per packed block (64 in the AVX-512 build, 32 below it)
  m.def("pack_panels", &pack_panels, "a float32 weight (out, in) packed for the recurrent GEMM (bfloat16: VNNI)",
        py::arg("weight"), py::arg("bf16") = false);
  m.def("panels_mm", &panels_mm, "x @ weight.T through the recurrent GEMM (the kernel where panels are given)");
  m.def("norm_rows_forward", &norm_rows_forward, "a normalization of all rows (the input term), forward");
  m.def("norm_rows_project", &norm_rows_project, "norm_rows_forward of a projection, a block of rows at a time");
  m.def("norm_rows_project_backward", &norm_rows_project_backward,
        "norm_rows_backward of a projection recomputed a block of rows at a time");
  m.def("norm_rows_backward", &norm_rows_backward, "a normalization of all rows (the input term), backward");
}
