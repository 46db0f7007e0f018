// CPU emulation (tests/cuda_emu): the runtime API subset csrc uses lives in emu_core.h.
#pragma once
#include "emu_core.h"
