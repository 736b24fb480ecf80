/* vision_ops.h: the CPU backend's vision-tower ops (vision_ops.c), for its op table. */
#ifndef M3_BACKEND_CPU_VISION_OPS_H
#define M3_BACKEND_CPU_VISION_OPS_H

#include "backend/backend.h"

extern const m3_vision_ops cpu_vision_ops;

#endif
