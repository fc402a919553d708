/*
 * Stand-in native libraries for importing the real TensorRT Python bindings (tensorrt_bindings/tensorrt.so of the
 * tensorrt-cu12-bindings wheels) on machines without TensorRT or a GPU. Compiled by tests/trt_bindings.py once per
 * TensorRT major version, as libnvinfer.so.N, libnvonnxparser.so.N and libnvinfer_plugin.so.N (soname set to the
 * same name), from this one file.
 *
 * It exports the C entry points the bindings link against (`nm -D --undefined-only tensorrt.so`). Every factory
 * returns NULL: the real module imports, its enums, Dims, ILogger and pybind11 argument checks are real, and any
 * call that would reach TensorRT's native builder or runtime fails ("factory function returned nullptr"). Nothing
 * here builds or runs an engine.
 *
 * STUB_TRT_VERSION: TensorRT's encoded version (major * 10000 + minor * 100 + patch), set by the compiler command.
 */
#include <stddef.h>
#include <stdint.h>

#ifndef STUB_TRT_VERSION
#error "compile with -DSTUB_TRT_VERSION=<major*10000+minor*100+patch>"
#endif

void *createInferBuilder_INTERNAL(void *logger, int32_t version) { (void)logger; (void)version; return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int32_t version)
{
    (void)engine; (void)logger; (void)version; return NULL;
}
void *createInferRuntime_INTERNAL(void *logger, int32_t version) { (void)logger; (void)version; return NULL; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int32_t version)
{
    (void)network; (void)logger; (void)version; return NULL;
}
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int32_t version)
{
    (void)refitter; (void)logger; (void)version; return NULL;
}
void *getBuilderPluginRegistry(int32_t capability) { (void)capability; return NULL; }
void *getPluginRegistry(void) { return NULL; }
int32_t getInferLibVersion(void) { return STUB_TRT_VERSION; }
int32_t getNvOnnxParserVersion(void) { return STUB_TRT_VERSION; }
_Bool initLibNvInferPlugins(void *logger, char const *libNamespace) { (void)logger; (void)libNamespace; return 0; }
