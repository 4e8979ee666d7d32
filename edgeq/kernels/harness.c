/* Standalone caller of one edgeq-generated TVM kernel, for cross-compiled builds run under an
 * emulator (qemu-aarch64): no TVM runtime, no Python on the target.
 *
 *   harness OUT_INDEX ARG0 ARG1 ...      ARG = DTYPE:D0xD1x..:FILE   (DTYPE f32 | f16 | u8)
 *
 * Reads every argument tensor from its raw little-endian FILE, calls KERNEL (the packed TVM-FFI
 * entry point `__tvm_ffi_<name>` of the generated object, given with -DKERNEL=...) with DLTensor
 * arguments, and writes argument OUT_INDEX back to its FILE. The handful of runtime hooks the
 * generated code calls (workspace allocation, the parallel-for launcher, error reporting) are
 * implemented here; parallel loops run serially. */
#include <tvm/runtime/c_backend_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ARGS 16

int32_t KERNEL(void* self, const TVMFFIAny* args, int32_t nargs, TVMFFIAny* ret);

extern void* __TVMBackendParallelLaunch;
extern void* __TVMBackendAllocWorkspace;
extern void* __TVMBackendFreeWorkspace;

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  fprintf(stderr, "kernel error %s: ", kind);
  for (int32_t i = 0; i < n; ++i) fputs(parts[i], stderr);
  fputc('\n', stderr);
}

static void* alloc_workspace(int device_type, int device_id, uint64_t nbytes, int dtype_code, int dtype_bits) {
  void* p = NULL;
  (void)device_type; (void)device_id; (void)dtype_code; (void)dtype_bits;
  return posix_memalign(&p, 64, nbytes ? nbytes : 64) ? NULL : p;
}

static int free_workspace(int device_type, int device_id, void* p) {
  (void)device_type; (void)device_id;
  free(p);
  return 0;
}

static int parallel_launch(FTVMParallelLambda f, void* cdata, int num_task) {
  TVMParallelGroupEnv env;
  (void)num_task;
  env.sync_handle = NULL;
  env.num_task = 1;
  return f(0, &env, cdata);
}

typedef struct {
  DLTensor t;
  int64_t shape[8];
  const char* path;
  size_t nbytes;
} Arg;

static int parse_arg(const char* spec, Arg* a) {
  char dtype[8];
  const char* c1 = strchr(spec, ':');
  const char* c2 = c1 ? strchr(c1 + 1, ':') : NULL;
  if (!c1 || !c2 || c1 - spec >= (long)sizeof dtype) return -1;
  memcpy(dtype, spec, c1 - spec);
  dtype[c1 - spec] = 0;
  memset(&a->t, 0, sizeof a->t);
  a->t.device.device_type = kDLCPU;
  a->t.dtype.lanes = 1;
  if (!strcmp(dtype, "f32")) { a->t.dtype.code = kDLFloat; a->t.dtype.bits = 32; }
  else if (!strcmp(dtype, "f16")) { a->t.dtype.code = kDLFloat; a->t.dtype.bits = 16; }
  else if (!strcmp(dtype, "u8")) { a->t.dtype.code = kDLUInt; a->t.dtype.bits = 8; }
  else return -1;
  int nd = 0;
  const char* p = c1 + 1;
  while (p < c2 && nd < 8) {
    a->shape[nd++] = strtoll(p, (char**)&p, 10);
    if (*p == 'x') ++p;
  }
  a->t.ndim = nd;
  a->t.shape = a->shape;
  a->path = c2 + 1;
  a->nbytes = a->t.dtype.bits / 8;
  for (int i = 0; i < nd; ++i) a->nbytes *= (size_t)a->shape[i];
  a->t.data = malloc(a->nbytes ? a->nbytes : 1);
  FILE* f = fopen(a->path, "rb");
  if (!f) return -2;
  size_t got = fread(a->t.data, 1, a->nbytes, f);
  fclose(f);
  return got == a->nbytes ? 0 : -3;
}

int main(int argc, char** argv) {
  if (argc < 3 || argc - 2 > MAX_ARGS) {
    fprintf(stderr, "usage: %s OUT_INDEX DTYPE:SHAPE:FILE ...\n", argv[0]);
    return 2;
  }
  __TVMBackendParallelLaunch = (void*)&parallel_launch;
  __TVMBackendAllocWorkspace = (void*)&alloc_workspace;
  __TVMBackendFreeWorkspace = (void*)&free_workspace;
  int out = atoi(argv[1]), n = argc - 2;
  Arg args[MAX_ARGS];
  TVMFFIAny packed[MAX_ARGS], ret;
  for (int i = 0; i < n; ++i) {
    if (parse_arg(argv[i + 2], &args[i])) {
      fprintf(stderr, "bad argument %d: %s\n", i, argv[i + 2]);
      return 2;
    }
    memset(&packed[i], 0, sizeof packed[i]);
    packed[i].type_index = kTVMFFIDLTensorPtr;
    packed[i].v_ptr = &args[i].t;
  }
  memset(&ret, 0, sizeof ret);
  ret.type_index = kTVMFFINone;
  int rc = KERNEL(NULL, packed, n, &ret);
  if (rc) {
    fprintf(stderr, "kernel returned %d\n", rc);
    return 1;
  }
  FILE* f = fopen(args[out].path, "wb");
  if (!f || fwrite(args[out].t.data, 1, args[out].nbytes, f) != args[out].nbytes) return 3;
  fclose(f);
  return 0;
}
